"""Kept for plugins written against it: the boundary objects live in :mod:`llmcore.contract`."""

from llmcore.contract import SampleResult, ScheduledBatch, ScheduledSeq

__all__ = ["SampleResult", "ScheduledBatch", "ScheduledSeq"]
