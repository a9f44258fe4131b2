"""Run-wide switches shared by every stage."""

from __future__ import annotations

from dagster import ConfigurableResource


class SettingInvalid(ValueError):
    """An environment setting with a value tally cannot use; the message names the
    setting and how to fix it (the CLI prints it on one line and exits 2)."""


class RunMode(ConfigurableResource):
    """`report_only`: compute and reconcile, but nothing leaves the machine
    (no usage pushed, no e-mail sent)."""

    report_only: bool = False
