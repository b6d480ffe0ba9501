"""Pipeline parallelism: stage cutting, schedules (gpipe, 1f1b, interleaved, zb-h1) and the
executor that runs them with point-to-point transfers."""
