"""Data groups (jaxctx.parallel.data_group): which processes load the same batch rows, on device layouts of
several hosts described by fake devices (only `.process_index` is read)."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxctx.config import ConfigError
from jaxctx.parallel import DataGroup, data_group_of_devices


def _layout(owners, shape):
    """A [data, fsdp, sequence, tensor] array of fake devices; owners[i] = the process of the i-th device."""
    devices = np.empty(len(owners), dtype=object)
    devices[:] = [SimpleNamespace(process_index=p) for p in owners]
    return devices.reshape(shape)


def _groups(owners, shape):
    return [data_group_of_devices(_layout(owners, shape), p) for p in sorted(set(owners))]


def test_rows_within_processes_make_one_group_per_process():
    # 2 hosts x 4 devices, data=4 x sequence=2: each sequence pair lies inside one host
    assert _groups([0, 0, 0, 0, 1, 1, 1, 1], (4, 1, 2, 1)) == [DataGroup(0, 2), DataGroup(1, 2)]


def test_a_sequence_axis_over_all_processes_makes_one_group():
    assert _groups([0, 0, 0, 0, 1, 1, 1, 1], (1, 1, 8, 1)) == [DataGroup(0, 1), DataGroup(0, 1)]
    # data=2 x sequence=4 with each row spread over both hosts (an interleaved device order)
    assert _groups([0, 0, 1, 1, 0, 0, 1, 1], (2, 1, 4, 1)) == [DataGroup(0, 1), DataGroup(0, 1)]


def test_processes_that_share_rows_form_groups_numbered_by_their_rows():
    # 4 hosts x 2 devices, data=2 x sequence=4: hosts {0, 1} hold rows 0, hosts {2, 3} rows 1
    assert _groups([0, 0, 1, 1, 2, 2, 3, 3], (2, 1, 4, 1)) == [DataGroup(0, 2)] * 2 + [DataGroup(1, 2)] * 2
    # the same with the hosts listed in another order: groups follow the rows, not the process numbers
    assert _groups([3, 3, 1, 1, 2, 2, 0, 0], (2, 1, 4, 1)) == [DataGroup(1, 2), DataGroup(0, 2),
                                                              DataGroup(1, 2), DataGroup(0, 2)]
    # fsdp=2 x sequence=2 x tensor=2 over 4 hosts: a (sequence x tensor) block spans two hosts
    assert _groups([0, 0, 1, 1, 2, 2, 3, 3], (1, 2, 2, 2)) == [DataGroup(0, 2)] * 2 + [DataGroup(1, 2)] * 2


def test_rows_shared_in_part_are_refused_naming_the_processes():
    # 2 hosts x 3 devices, data=3 x sequence=2: process 0 holds row blocks {0, 1}, process 1 {1, 2}
    with pytest.raises(ConfigError, match=r"processes \[0, 1\] share some batch rows but not all.*"
                                          r"parallel.sequence x parallel.tensor = 2"):
        data_group_of_devices(_layout([0, 0, 0, 1, 1, 1], (3, 1, 2, 1)), 0)


def test_unequal_groups_and_a_process_without_devices_are_refused():
    # 3 hosts x 4 devices, data=3 x sequence=4 with hosts 1 and 2 interleaved: groups of 1 and 2 row blocks
    owners = [0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="unequal numbers of row blocks"):
        data_group_of_devices(_layout(owners, (3, 1, 4, 1)), 0)
    with pytest.raises(ConfigError, match="process 2 has no device in the mesh"):
        data_group_of_devices(_layout([0, 0, 1, 1], (2, 1, 2, 1)), 2)
