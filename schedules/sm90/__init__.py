"""Hopper (sm_90a) schedules: TMA loads, wgmma and warp specialisation through TileLang."""
