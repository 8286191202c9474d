import unittest

from search.binary import find_index


class FindIndexTest(unittest.TestCase):
    def test_every_item_is_found(self):
        for n in range(1, 9):
            items = list(range(0, 2 * n, 2))
            for i, item in enumerate(items):
                self.assertEqual(find_index(items, item), i, (items, item))

    def test_absent_items(self):
        self.assertEqual(find_index([1, 3, 5], 2), -1)
        self.assertEqual(find_index([1, 3, 5], 9), -1)
        self.assertEqual(find_index([1, 3, 5], 0), -1)

    def test_empty(self):
        self.assertEqual(find_index([], 1), -1)
