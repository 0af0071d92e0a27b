"""What every layer of jattn uses: user errors, file helpers, configs, downloads, XLA flags."""
