import unittest

from textstats.counts import most_common, word_counts


class WordCountsTest(unittest.TestCase):
    def test_single_spaces(self):
        self.assertEqual(word_counts("a b a"), {"a": 2, "b": 1})

    def test_any_whitespace_separates_words(self):
        self.assertEqual(word_counts("The cat\n  the  hat\t"), {"the": 2, "cat": 1, "hat": 1})

    def test_no_words(self):
        self.assertEqual(word_counts("   "), {})
        self.assertIsNone(most_common(""))

    def test_most_common(self):
        self.assertEqual(most_common("b a b  a b"), "b")
