"""Numbers the kernels and the rest of sla-tl must agree on, with no TileLang import, so that
`sla_tl.spec` and the reference can read them too."""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

LINEAR_EPS = 1e-5
"""Added to the linear branch's denominator (as in the paper's reference code)."""
