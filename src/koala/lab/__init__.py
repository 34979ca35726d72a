"""Small worlds for running the KOALA method without real weights or data: tiny random SDXL-topology models
(``tiny``), the synthetic shapes data set (``shapes``), shapes-world models and the packaged teacher
(``models``) and its training recipe (``train_teacher``)."""
