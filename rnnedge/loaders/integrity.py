"""Every member of a zip model file checked against its CRC before torch opens it.

torch.save, TorchScript and torch.export (.pt2) files are zip archives, and torch's
readers do not check the members' CRC-32: a flipped bit in a weight loads as a wrong
number (off by thousands) and the export "passes" against the corrupted model. Reading
each member through ``zipfile`` checks it; a mismatch names the member.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

from rnnedge.errors import ModelLoadError, UsageError, first_line

CHUNK = 1 << 20  # members are streamed: a model file is never held in memory twice


def check_zip_members(path: Path) -> int:
    """Read every member of the zip archive at ``path`` and check its CRC-32.

    Returns the number of members checked (0: not a zip, nothing to check here).
    Raises ModelLoadError naming the first damaged member.
    """
    if not zipfile.is_zipfile(path):
        return 0
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for info in members:
                try:
                    with archive.open(info) as member:
                        while member.read(CHUNK):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
                    raise ModelLoadError(
                        f"{path} is damaged: its member {info.filename} fails the zip check "
                        f"({_reason(exc)}); the file changed after it was saved: copy or save "
                        "the model again"
                    ) from None
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{path} is a damaged zip archive ({exc}); save the model again") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path} ({exc.strerror or exc}); check the file") from None
    return len(members)


def _reason(exc: Exception) -> str:
    return "CRC-32 mismatch" if "CRC" in str(exc) else first_line(exc, 120)


def check_finite_weights(model, what: str = "the model") -> None:
    """Refuse a model whose floating-point weights or buffers hold NaN or inf.

    Such a model is not a structure rnnedge cannot export: its graph would output NaN/inf,
    and the parity gate would report every case as a miss. The error names the tensors.
    model: anything with ``state_dict()`` (an nn.Module, a ScriptModule).
    """
    import torch

    bad = []
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nans = int(torch.isnan(tensor).sum())
        infs = int((~finite).sum()) - nans
        counts = ", ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "inf")) if n)
        bad.append((name, nans, infs, counts))
    if not bad:
        return
    kinds = " and ".join(k for k, i in (("NaN", 1), ("inf", 2)) if any(b[i] for b in bad))
    listed = "; ".join(f"{name} ({counts})" for name, _, _, counts in bad[:3])
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    raise UsageError(
        f"{what}'s weights hold {kinds} values: {listed}{more}; a graph of them would only "
        "output NaN/inf: fix the training (or load the right checkpoint) and export again"
    )
