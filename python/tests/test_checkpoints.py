"""Handle checkpoints in memory and inside open files: the file's bytes, exact resume, bad input refused."""
import pytest

import polyak
from conftest import buffer


def make_checkpointed(rng, schedules=(polyak.Constant(0.9), polyak.Power(sigma_rel=0.1)), seed=1):
    w, w_ptr = buffer([rng.uniform(-1, 1) for _ in range(37)])
    count, count_ptr = buffer([0], "q")
    h = polyak.Handle(list(schedules), seed=seed)
    h.add("w", w_ptr, "f32", (37,))
    h.add_copy("count", count_ptr, "i64", ())
    h.finalize()
    return h, w, count


def test_checkpoints_in_memory_are_the_files_bytes_and_resume_exactly(rng, tmp_path):
    h, w, count = make_checkpointed(rng)
    for step in (1, 2, 5):
        w[step] += 0.5
        count[0] = step
        h.update(step)
    blob = h.save_bytes()
    h.save(tmp_path / "ema.safetensors")
    assert (tmp_path / "ema.safetensors").read_bytes() == blob
    assert len(blob) <= h.save_size()
    again, w2, count2 = make_checkpointed(rng)
    again.load_bytes(bytearray(blob))
    assert again.step == 5 and again.save_bytes() == blob
    w2[:], count2[:] = w, count
    for handle in (h, again):
        handle.update(9)
    assert again.save_bytes() == h.save_bytes()
    h.close(), again.close()


def test_a_bad_checkpoint_or_buffer_is_refused_with_nothing_changed(rng):
    h, w, _ = make_checkpointed(rng)
    h.update(1)
    blob = h.save_bytes()
    short = bytearray(len(blob) - 1)
    with pytest.raises(polyak.InvalidArgError):
        h.save_to_memory(short)
    assert short == bytearray(len(blob) - 1)  # nothing written
    w[0] += 1.0
    h.update(2)
    state = h.save_bytes()
    corrupt = bytearray(blob)
    corrupt[-1] ^= 1
    with pytest.raises(polyak.FormatError, match="checksum"):
        h.load_bytes(corrupt)
    with pytest.raises(polyak.FormatError):
        h.load_bytes(b"not a checkpoint at all")
    with pytest.raises(polyak.FormatError):
        h.load_bytes(blob[:-8])
    other, _, _ = make_checkpointed(rng, schedules=[polyak.Constant(0.9), polyak.Power(sigma_rel=0.05)])
    with pytest.raises(polyak.MismatchError, match="shadow 1"):
        h.load_bytes(other.save_bytes())
    assert h.save_bytes() == state and h.step == 2
    h.load_bytes(blob)
    assert h.step == 1


def test_checkpoints_inside_an_open_file_between_the_trainers_own_bytes(rng, tmp_path):
    h, w, _ = make_checkpointed(rng)
    h.update(3)
    path = tmp_path / "trainer.state"
    with open(path, "wb") as f:
        f.write(b"trainer header")
        h.save_fd(f)  # a file object: flushed, then its offset moves past the checkpoint
        f.write(b"optimizer state")
    data = path.read_bytes()
    blob = h.save_bytes()
    assert data == b"trainer header" + blob + b"optimizer state"
    again, _, _ = make_checkpointed(rng)
    with open(path, "rb") as f:
        assert f.read(14) == b"trainer header"
        again.load_fd(f)
        assert f.read() == b"optimizer state"
        with pytest.raises(polyak.FileIOError):
            again.load_fd(f)  # at the end of the file
        assert f.read() == b""
        with pytest.raises(polyak.FileIOError, match="writing"):
            h.save_fd(f.fileno())  # an int fd, open for reading only
    assert again.save_bytes() == blob
    h.close(), again.close()


