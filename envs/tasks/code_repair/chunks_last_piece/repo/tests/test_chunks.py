import unittest

from listutil.chunks import chunks


class ChunksTest(unittest.TestCase):
    def test_even_split(self):
        self.assertEqual(chunks([1, 2, 3, 4], 2), [[1, 2], [3, 4]])

    def test_last_piece_is_kept(self):
        self.assertEqual(chunks([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]])
        self.assertEqual(chunks("abcdefg", 3), ["abc", "def", "g"])

    def test_shorter_than_size(self):
        self.assertEqual(chunks([1, 2], 5), [[1, 2]])

    def test_empty(self):
        self.assertEqual(chunks([], 3), [])

    def test_bad_size(self):
        with self.assertRaises(ValueError):
            chunks([1], 0)
