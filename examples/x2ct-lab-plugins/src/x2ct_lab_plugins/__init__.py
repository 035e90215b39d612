"""x2ct-lab-plugins: a metric protocol (``lab``) and an epoch-log hook plugin (``lab_epoch_log``)."""
