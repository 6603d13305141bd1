"""TileLang kernels, one folder per GPU arch (see `archs`). They know nothing of the rest of
sla_tl."""
