"""Small CPU demos (offline data) showing that the token modules learn."""
