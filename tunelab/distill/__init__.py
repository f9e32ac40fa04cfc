"""Distillation: a larger model (local or an OpenAI-compatible endpoint) answers prompts for training."""

from tunelab.distill.collect import DistillResult, distill, input_key
from tunelab.distill.filters import Filters, dedup_key, task_checks
from tunelab.distill.teachers import Answer, EndpointTeacher, Generation, LocalTeacher, Teacher, make_teacher

__all__ = ["Answer", "DistillResult", "EndpointTeacher", "Filters", "Generation", "LocalTeacher", "Teacher",
           "dedup_key", "distill", "input_key", "make_teacher", "task_checks"]
