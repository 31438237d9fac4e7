"""``python -m mmutrace.scenarios run NAME ...``: the scenarios CLI alone, for running in a child."""

from mmutrace.cli import fail
from mmutrace.cli.scenarios import scenarios_app
from mmutrace.errors import MmutraceError

try:
    scenarios_app(prog_name="python -m mmutrace.scenarios")
except MmutraceError as exc:
    fail(str(exc), exc.exit_code)
