"""Data planes outside Python: virtqueues handed to a back-end process over vhost-user."""
