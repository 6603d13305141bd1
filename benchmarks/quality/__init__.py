"""`sla-tl quality`: a fine-tuning benchmark of sparse attention against dense.

A small video DiT pretrained with dense attention on procedural clips, then fine-tuned the
same number of steps in each arm (dense, sparse-only, SLA, SLA with k_low 0.10, SALAD-style
gated); or the same protocol on a user's task or captured activations. See `cli`.
"""
