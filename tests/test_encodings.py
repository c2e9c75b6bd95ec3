"""Cohere's embedding_types, against sentence-transformers' own quantization where it has one."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from tandem.server.http.encodings import encoded


@pytest.fixture
def unit_vectors() -> np.ndarray:
    vectors = np.random.default_rng(7).normal(size=(5, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_binary_packs_signs_as_sentence_transformers_does(unit_vectors, kind) -> None:
    np.testing.assert_array_equal(encoded(unit_vectors, kind),
                                  quantize_embeddings(unit_vectors, precision=kind))  # fmt: skip


def test_int8_and_uint8_scale_a_unit_vector_by_127(unit_vectors) -> None:
    int8 = np.array(encoded(unit_vectors, "int8"))
    assert int8.min() >= -127
    assert int8.max() <= 127
    assert np.abs(int8 / 127 - unit_vectors).max() <= 0.5 / 127 + 1e-7
    np.testing.assert_array_equal(np.array(encoded(unit_vectors, "uint8")) - 128, int8)
    ones = encoded(np.array([[1.0, -1.0, 0.0]], dtype=np.float32), "int8")
    assert ones == [[127, -127, 0]]


def test_base64_is_the_float32_bytes_little_endian(unit_vectors) -> None:
    strings = encoded(unit_vectors, "base64")
    decoded = np.array([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in strings])
    np.testing.assert_array_equal(decoded, unit_vectors)
    assert encoded(unit_vectors, "float") == unit_vectors.tolist()


def test_an_unknown_type_is_a_bug_not_a_guess(unit_vectors) -> None:
    with pytest.raises(ValueError, match="float16"):
        encoded(unit_vectors, "float16")
