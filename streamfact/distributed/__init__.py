"""Running pipelines past one process: Ray actors per partition, tree merges."""

from streamfact.distributed.ray_runner import RayResult, run_on_ray

__all__ = ["RayResult", "run_on_ray"]
