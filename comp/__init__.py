"""ComP (Cross-modal Prompting) for incomplete multimodal emotion recognition: model, losses, masks, training."""
