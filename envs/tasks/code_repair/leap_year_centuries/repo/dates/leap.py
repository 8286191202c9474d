"""Gregorian leap years."""


def is_leap_year(year):
    """True for years divisible by 4, except centuries that are not divisible by 400."""
    return year % 4 == 0 and year % 100 != 0


def days_in_february(year):
    """29 in a leap year, else 28."""
    return 29 if is_leap_year(year) else 28
