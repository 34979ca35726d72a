"""The shapes world, a self-contained top layer for running the KOALA method without real weights or data:
the synthetic shapes data set (``shapes``), its model-free scorer (``score``), the shapes models and the packaged
teacher (``models``), the teacher's training recipe (``train_teacher``) and the demo (``demo``)."""
