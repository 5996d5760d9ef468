"""Store-and-forward to the cloud over MQTT."""
