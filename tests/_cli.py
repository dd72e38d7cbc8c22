"""Running ``mfcore-distill`` in the tests."""

from __future__ import annotations

import pytest

from mfcore.adapters.distill_cli import main


def usage_error(argv, capsys) -> str:
    """``mfcore-distill argv``'s usage error (exit 2, no traceback): its message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
