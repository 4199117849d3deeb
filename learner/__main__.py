"""``python -m learner``: run the learner process (see :mod:`learner.main`)."""

from learner.main import main

main()
