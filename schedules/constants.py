"""Numbers the kernels and the rest of sla-tl must agree on, with no TileLang import, so that
`sla_tl.spec` and the reference can read them too."""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

LINEAR_EPS = 1e-5
"""Added to the linear branch's denominator (as in the paper's reference code)."""

TMA_ROW_FLOATS = 4
"""A float32 row vector ([B, H, L]) that a kernel loads by TMA must have L a multiple of
this: TMA needs every stride but the innermost to be a multiple of 16 bytes. dK/dV loads
LSE and delta that way, so the backward passes them padded to it (zeros past Lq)."""
