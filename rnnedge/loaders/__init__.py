"""Model files: state_dict + arch, TorchScript, torch.export .pt2, pickles."""
