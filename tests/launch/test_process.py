"""`free_port` (lmfleet/launch/process.py): a port a launched node can bind, chosen
where the kernel does not hand out ports itself."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lmfleet.launch import process
from lmfleet.launch.process import free_port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_free_port_is_below_the_kernels_own_range_when_there_is_room() -> None:
    low = process._ephemeral_low()
    if low - process.LOWEST_PORT < 1000:
        pytest.skip(f"the kernel's range starts at {low}: no room below it")
    ports = [free_port() for _ in range(20)]
    assert all(process.LOWEST_PORT <= p < low and _bindable(p) for p in ports), ports


def test_ports_handed_out_one_after_another_are_all_different() -> None:
    """Nodes launched together each get their own port, though none is bound yet (a
    random pick each time gave two nodes one port in a full test run)."""
    if process._ephemeral_low() - process.LOWEST_PORT < 1000:
        pytest.skip("no room below the kernel's range: the kernel picks")
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_without_room_below_the_range_the_kernel_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squeezed = tmp_path / "ip_local_port_range"
    squeezed.write_text("10500\t60999\n")  # less than 1,000 ports below
    monkeypatch.setattr(process, "EPHEMERAL_RANGE", squeezed)
    port = free_port()
    assert port >= 10500 and _bindable(port)
    monkeypatch.setattr(process, "EPHEMERAL_RANGE", tmp_path / "missing")  # not Linux
    assert _bindable(free_port())
