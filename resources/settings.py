"""Run-wide switches shared by every stage."""

from __future__ import annotations

from dagster import ConfigurableResource


class RunMode(ConfigurableResource):
    """`report_only`: compute and reconcile, but nothing leaves the machine
    (no usage pushed, no e-mail sent)."""

    report_only: bool = False
