"""TileLang kernels (schedules) per GPU target. They know nothing of the rest of sla_tl."""
