# The README's commands. Each target is self-sufficient on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test lint pretrain chat-demo rlhf-demo recipe-demo

# Re-runs only when the pins or the package metadata change. torch comes first so nothing
# that depends on it pulls a CUDA build.
$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-cpu.txt
	$(PIP) install --quiet -r requirements-cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests launch benchmarks

# The embedded default: pretrain the `tiny` preset on Shakespeare with 2 CPU processes.
DEMO := data/shakespeare
pretrain: $(STAMP)
	$(PY) launch/prepare_demo.py --out $(DEMO)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/pretrain.py \
	    model=tiny data=shakespeare train=cpu_demo run_name=cpu-demo \
	    optim.warmup_steps=15 checkpoint.every=50 \
	    harness.tasks=[demo_shakespeare_next_line,demo_shakespeare_ppl] \
	    tokenizer=$(DEMO)/tokenizer.model $(ARGS)
	@echo "run folder: runs/cpu-demo (metrics.jsonl, loss_curve.png, samples.txt, checkpoints/)"

# The chat demo on the pretraining demo's model: SFT on LLaMA-Factory's 999 Alpaca records
# (2-3 minutes on 2 idle cores), then a reward model on its 300 preference pairs, whose
# held-out accuracy table is printed. `make pretrain` runs first only if its run has no
# checkpoint. Extra overrides: SFT_ARGS="..." for the SFT run, RM_ARGS="..." for the reward model.
CHAT_DATA := data/chat_demo
DEMO_CHECKPOINTS := runs/cpu-demo/checkpoints
chat-demo: $(STAMP)
	@ls -d $(DEMO_CHECKPOINTS)/step-* >/dev/null 2>&1 || $(MAKE) pretrain ARGS=
	$(PY) launch/prepare_chat_demo.py --out $(CHAT_DATA)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/sft.py \
	    init_from=$(DEMO_CHECKPOINTS) tokenizer=$(DEMO)/tokenizer.model \
	    data.paths=[$(CHAT_DATA)/alpaca_en_demo.json] data.seq_len=512 data.valid_fraction=0.05 \
	    train.global_batch_tokens=4096 train.micro_batch=4 train.steps=24 optim.lr=1e-3 \
	    train.device=cpu run_name=chat-demo-sft $(SFT_ARGS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/reward.py \
	    init_from=runs/chat-demo-sft/checkpoints tokenizer=$(DEMO)/tokenizer.model \
	    data.paths=[$(CHAT_DATA)/dpo_en_demo.json] data.max_len=768 optim.lr=1e-4 \
	    data.valid_fraction=0.2 train.global_batch_pairs=16 train.micro_batch=4 \
	    train.device=cpu run_name=chat-demo-rm $(RM_ARGS)
	cat runs/chat-demo-rm/reward_eval.md
	@echo "chat with the SFT model: $(PY) launch/chat.py --checkpoint runs/chat-demo-sft/checkpoints"

# The RLHF stages on the chat demo's models (`make chat-demo` runs first if its reward model is
# missing): one iteration of rejection sampling on 32 prompts of the preference data, scored by
# the demo reward model and fine-tuned on the kept set, then 4 PPO iterations from that policy
# with the reward model as scorer and value model. Extra overrides: RS_ARGS, PPO_ARGS.
DEMO_RM := runs/chat-demo-rm/checkpoints
rlhf-demo: $(STAMP)
	@ls -d $(DEMO_RM)/step-* >/dev/null 2>&1 || $(MAKE) chat-demo
	$(PY) launch/prepare_chat_demo.py --out $(CHAT_DATA) --prompts 32
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/rejection_sampling.py \
	    policy=runs/chat-demo-sft/checkpoints tokenizer=$(DEMO)/tokenizer.model \
	    prompts=[$(CHAT_DATA)/prompts.jsonl] scorer.reward_model=$(DEMO_RM) scorer.max_len=768 \
	    sampling.num_samples=4 sampling.temperatures=[0.8,1.2] sampling.max_new_tokens=32 \
	    sampling.prompts_per_batch=8 sft.data.seq_len=512 sft.train.global_batch_tokens=2048 \
	    sft.train.micro_batch=2 sft.optim.lr=1e-4 sft.train.wandb=false \
	    sft.sample.max_new_tokens=16 device=cpu run_name=rlhf-demo-rs $(RS_ARGS)
	cat runs/rlhf-demo-rs/iter-1/report.md
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/ppo.py \
	    policy=runs/rlhf-demo-rs/iter-1/sft/checkpoints tokenizer=$(DEMO)/tokenizer.model \
	    prompts=[$(CHAT_DATA)/prompts.jsonl] scorer.reward_model=$(DEMO_RM) scorer.max_len=768 \
	    value_from=$(DEMO_RM) iterations=4 ppo.batch_prompts=16 ppo.minibatch_prompts=8 \
	    ppo.max_new_tokens=32 optim.lr=1e-5 micro_batch=4 eval_every=2 valid_fraction=0.25 \
	    device=cpu wandb=false run_name=rlhf-demo-ppo $(PPO_ARGS)
	@echo "rejection sampling: runs/rlhf-demo-rs/iter-1 (report.md, best_of_k.png, kept.jsonl, sft/)"
	@echo "PPO: runs/rlhf-demo-ppo (metrics.jsonl, checkpoints/)"

# The whole Llama 2 recipe in one command (conf/recipe.yaml): pretrain -> SFT -> Helpfulness
# and Safety RMs -> RLHF V1 (rejection sampling), V2 (rejection sampling, then PPO) -> GAtt ->
# safety context distillation -> evaluation, on a synthetic chat task with known rules, into
# runs/recipe-demo (overview.md closes it). A rerun skips the stages that are done. Extra
# overrides: RECIPE_ARGS="...".
recipe-demo: $(STAMP)
	$(PY) launch/recipe.py $(RECIPE_ARGS)
	@echo "overview: runs/recipe-demo/overview.md"
