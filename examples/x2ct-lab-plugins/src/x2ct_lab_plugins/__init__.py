"""x2ct-lab-plugins: a metric protocol (``lab``), an epoch-log hook plugin (``lab_epoch_log``) and a JSON-lines
experiment tracker (``jsonl``, plugin ``lab_tracker``)."""
