"""What travels on the wire: payload codecs and byte accounting."""
