"""Rank, device and thread placement of ``qmmm-driver run`` workers (fast, no MPI launch)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from qmmm_driver import parallel
from qmmm_driver.ipi.client import IPIClient
from qmmm_driver.parallel import (DeviceError, Placement, detect_placement, launched_by_mpi, select_device,
                                  threads_per_worker)


def test_launcher_detection():
    assert not launched_by_mpi({"HOME": "/root", "SLURM_PROCID": "0"})
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "HYDI_CONTROL_FD"):
        assert launched_by_mpi({name: "0"}), name


def test_single_process_needs_no_mpi():
    p = detect_placement({"HOME": "/root"})
    assert (p.rank, p.size, p.local_rank, p.local_size, p.mpi) == (0, 1, 0, 1, False)
    assert p.host


def test_placement_from_launcher_variables():
    p = parallel._placement_from_env({"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1",
                                      "MPI_LOCALNRANKS": "4"}, "node7")
    assert (p.rank, p.size, p.local_rank, p.local_size) == (3, 8, 1, 4)
    p = parallel._placement_from_env({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6",
                                      "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, "n")
    assert (p.rank, p.size, p.local_rank, p.local_size) == (5, 6, 2, 3)
    assert Placement(1, 4, 1, 2, "n3").label() == "rank 1/4 on n3 (local 1/2)"


def test_threads_per_worker():
    assert threads_per_worker(0, {}) == 1
    assert threads_per_worker(0, {"OMP_NUM_THREADS": "3"}) == 3  # the environment's choice
    assert threads_per_worker(2, {"OMP_NUM_THREADS": "3"}) == 2  # --threads wins
    assert threads_per_worker(0, {"OMP_NUM_THREADS": "junk"}) == 1


def test_select_device(monkeypatch):
    assert select_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert select_device("auto", 1) == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        select_device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert select_device("auto", 6) == torch.device("cuda:2")  # local rank 6 on a 4-GPU node
    assert select_device("cuda", 1) == torch.device("cuda:1")
    assert select_device("cuda:3", 0) == torch.device("cuda:3")
    with pytest.raises(DeviceError, match="has 4 GPU"):
        select_device("cuda:4", 0)
    with pytest.raises(DeviceError, match="use auto, cpu"):
        select_device("tpu", 0)


def test_coupling_default_and_init_override():
    """--coupling applies until i-PI's <parameters> set one in INIT; the batch size comes with INIT too."""
    from qmmm_driver.evaluator import ModelEvaluator

    class Stub:
        structure = None
        parameters = ModelEvaluator.parameters

    a, b = socket.socketpair()
    with a, b:
        client = IPIClient(b, Stub(), {"coupling": 0.7})
        assert client.params == {"coupling": 0.7}
        text = b" "
        a.sendall(b"INIT        " + np.array([0, len(text)], np.int32).tobytes() + text)
        client._recv_into(client._hdr_view, "header")
        client._on_init()
        assert client.params == {"coupling": 0.7} and client.batch_size == 1
        text = b" coupling : 0.25 , , batch_size:2"
        a.sendall(b"INIT        " + np.array([0, len(text)], np.int32).tobytes() + text)
        client._recv_into(client._hdr_view, "header")
        client._on_init()
        assert client.params == {"coupling": 0.25} and client.batch_size == 2
