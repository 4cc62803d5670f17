"""Pure-functional Flax schedulers with diffusers' API; see `common` for the contract they share."""
from flax_inpaint.schedulers.common import (
    SchedulerMixin,
    SchedulerOutput,
    begin_index_for_strength,
)

__all__ = ["SchedulerMixin", "SchedulerOutput", "begin_index_for_strength"]
