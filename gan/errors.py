"""Errors that are the user's to fix.

Scripts catch `UserError`, print its message as one line and exit non-zero, so a user mistake
(a bad config, a missing dataset, an unknown checkpoint step) never ends in a traceback.
"""


class UserError(Exception):
  """A mistake the user can fix; the message says what is wrong and what to do."""
