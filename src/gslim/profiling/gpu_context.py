"""What a GPU latency number was measured under, read from the system, never guessed.

GPU latency moves with clocks and power: boost clocks drift with temperature, a lowered
power limit or a Jetson power mode (``nvpmodel``) caps them, and ``jetson_clocks`` pins
them at the mode's maximum. Every GPU latency record carries:

* the GPU's name, compute capability, driver, CUDA runtime and TensorRT version;
* from ``nvidia-smi`` (where it runs): current and maximum SM/memory clocks, the power
  limit and draw, persistence mode, and the active clock-event (throttle) reasons, plus a
  warning when the SM clock is below its maximum and the application clocks are not pinned
  (``nvidia-smi -lgc`` / ``-ac``): then results vary with boost;
* on a Jetson (``/etc/nv_tegra_release`` exists): the power mode as ``nvpmodel -q`` prints it
  and the clock state as ``jetson_clocks --show`` prints it, when those tools are present.

A value that cannot be read is ``None`` with the reason in ``notes``; nothing is inferred
from the GPU's name.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

Runner = Callable[[list[str]], Optional[str]]

SMI_FIELDS = (
    "name",
    "driver_version",
    "clocks.sm",
    "clocks.max.sm",
    "clocks.mem",
    "clocks.max.mem",
    "clocks.applications.graphics",
    "power.limit",
    "power.draw",
    "persistence_mode",
    "clocks_event_reasons.active",
)


def run_command(cmd: list[str]) -> Optional[str]:
    """stdout of ``cmd``, or None when it is missing, fails or takes over 10 s."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _number(text: str) -> Optional[float]:
    try:
        return float(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def nvidia_smi(device_id: int = 0, run: Runner = run_command) -> dict[str, Any]:
    """Clocks, power and throttle state of one GPU from ``nvidia-smi --query-gpu``."""
    fields = SMI_FIELDS
    out = run(
        [
            "nvidia-smi",
            f"--id={device_id}",
            f"--query-gpu={','.join(fields)}",
            "--format=csv,noheader,nounits",
        ]
    )
    if out is None:  # drivers before R535 name the throttle reasons differently
        fields = tuple(f.replace("clocks_event_reasons", "clocks_throttle_reasons") for f in SMI_FIELDS)
        out = run(
            [
                "nvidia-smi",
                f"--id={device_id}",
                f"--query-gpu={','.join(fields)}",
                "--format=csv,noheader,nounits",
            ]
        )
    if not out or not out.strip():
        return {
            "available": False,
            "notes": ["nvidia-smi did not answer (not installed, or no NVIDIA driver)"],
        }
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")]
    if len(values) != len(SMI_FIELDS):
        return {"available": False, "notes": [f"unexpected nvidia-smi output: {out.strip()[:120]}"]}
    raw = dict(zip(SMI_FIELDS, values))
    info: dict[str, Any] = {
        "available": True,
        "gpu": raw["name"],
        "driver": raw["driver_version"],
        "sm_clock_mhz": _number(raw["clocks.sm"]),
        "sm_clock_max_mhz": _number(raw["clocks.max.sm"]),
        "mem_clock_mhz": _number(raw["clocks.mem"]),
        "mem_clock_max_mhz": _number(raw["clocks.max.mem"]),
        "application_clock_mhz": _number(raw["clocks.applications.graphics"]),
        "power_limit_w": _number(raw["power.limit"]),
        "power_draw_w": _number(raw["power.draw"]),
        "persistence_mode": raw["persistence_mode"],
        "clock_event_reasons": raw["clocks_event_reasons.active"],
        "notes": [],
    }
    sm, sm_max, app = info["sm_clock_mhz"], info["sm_clock_max_mhz"], info["application_clock_mhz"]
    pinned = sm is not None and sm_max is not None and app is not None and app >= sm_max and sm >= sm_max
    info["clocks_pinned"] = pinned
    if not pinned:
        info["notes"].append(
            "GPU clocks are not locked at their maximum (sm "
            f"{sm} of {sm_max} MHz): latency varies with boost; lock them for stable numbers "
            "(sudo nvidia-smi -lgc MAX,MAX, or jetson_clocks on a Jetson)"
        )
    return info


def jetson_state(run: Runner = run_command, root: Path = Path("/")) -> Optional[dict[str, Any]]:
    """Power mode and clock state of a Jetson, or None on any other machine."""
    if not (root / "etc" / "nv_tegra_release").exists():
        return None
    release = (root / "etc" / "nv_tegra_release").read_text(errors="replace").strip().splitlines()
    mode = run(["nvpmodel", "-q"])
    clocks = run(["jetson_clocks", "--show"])
    state: dict[str, Any] = {
        "l4t_release": release[0] if release else None,
        "nvpmodel": mode.strip().splitlines() if mode else None,
        "jetson_clocks": clocks.strip().splitlines()[:12] if clocks else None,
        "notes": [],
    }
    if mode is None:
        state["notes"].append("nvpmodel -q did not answer: the power mode is unknown")
    if clocks is None:
        state["notes"].append(
            "jetson_clocks --show did not answer (it needs root): the clock state is unknown"
        )
    return state


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001 - absence (or a broken install) is the information
        return None


def gpu_context(device_id: int = 0, run: Runner = run_command, root: Path = Path("/")) -> dict[str, Any]:
    """The measurement context recorded with every GPU latency result."""
    import torch

    props = torch.cuda.get_device_properties(device_id)
    smi = nvidia_smi(device_id, run)
    context: dict[str, Any] = {
        "kind": "cuda",
        "gpu": torch.cuda.get_device_name(device_id),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": smi.get("driver") or driver_version(),
        "cuda_runtime": torch.version.cuda,
        "tensorrt": tensorrt_version(),
        "device_id": device_id,
        "clocks": {k: v for k, v in smi.items() if k not in ("gpu", "driver", "notes")},
        "notes": list(smi.get("notes", [])),
    }
    jetson = jetson_state(run, root)
    if jetson is not None:
        context["jetson"] = jetson
        context["notes"] += jetson["notes"]
    return context


def driver_version() -> Optional[str]:
    """The NVIDIA driver version from /proc (no nvidia-smi needed), else nvidia-smi's."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for tok in text.split():
            if tok.count(".") >= 1 and tok.replace(".", "").isdigit():
                return tok
    except OSError:
        pass
    out = run_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out and out.strip() else None
