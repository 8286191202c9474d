import unittest

from textutil.slug import slugify


class SlugifyTest(unittest.TestCase):
    def test_words_are_lowercased_and_joined(self):
        self.assertEqual(slugify("Hello, World!"), "hello-world")

    def test_digits_and_spaces(self):
        self.assertEqual(slugify("  Python 3 Tips  "), "python-3-tips")

    def test_already_a_slug(self):
        self.assertEqual(slugify("already-a-slug"), "already-a-slug")

    def test_empty(self):
        self.assertEqual(slugify("!!!"), "")
