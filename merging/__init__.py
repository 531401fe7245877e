"""The merge stage: the partials format, the pure merge, and the merger thread that publishes windows."""
