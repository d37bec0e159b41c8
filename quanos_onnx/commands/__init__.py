"""One module per command (compile, analyze, evaluate, finetune, energy); options.py holds
what they share. Commands sit above every stage; nothing below imports them."""
