#!/bin/sh
# The demo pipeline on the embedded tiny default: everything runs offline on CPU (2 ranks) and goes to
# $DEMO_DIR (default runs/demo). Each stage is a plain command you can copy and run on its own.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEMO_DIR=${DEMO_DIR:-runs/demo}
NUM_GPUS=${NUM_GPUS:-2}
PRESET=${PRESET:-tiny}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PATH="$(dirname "$PY"):$PATH"
mkdir -p "$DEMO_DIR"
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

stage "0/1 base model: tiny LLaMA + SentencePiece tokenizer, built offline"
[ -f "$DEMO_DIR/base/model.safetensors" ] || \
  "$PY" -m alpaca_rlhf.tools.make_tiny_model --output_dir "$DEMO_DIR/base" --preset "$PRESET"

stage "1/4 step 1: supervised fine-tuning on the demonstrations (--data_split 0,8,2: the comparisons go to steps 2 and 3)"
sh run.sh --num_gpus "$NUM_GPUS" alpaca_rlhf/deepspeed_chat/training/step1_supervised_finetuning/main.py \
  --data_path data/demo/Dahoas/rm-static --sft_only_data_path data/demo/MultiTurnAlpaca \
  --data_output_path "$DEMO_DIR/data" --model_name_or_path "$DEMO_DIR/base" \
  --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --max_seq_len 256 \
  --data_split 0,8,2 --learning_rate 5e-4 --num_train_epochs 3 --num_warmup_steps 20 \
  --output_dir "$DEMO_DIR/actor" --zero_stage 2 --deepspeed --enable_tensorboard

stage "2/4 step 2: reward model (full fine-tuning, 2 epochs: it has to learn which values are right)"
sh run.sh --num_gpus "$NUM_GPUS" alpaca_rlhf/deepspeed_chat/training/step2_reward_model_finetuning/main.py \
  --data_path data/demo/Dahoas/rm-static --data_output_path "$DEMO_DIR/data" \
  --model_name_or_path "$DEMO_DIR/actor" --num_padding_at_beginning 0 --data_split 0,8,2 --max_train_samples 4800 \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 32 --max_seq_len 256 \
  --learning_rate 2e-4 --weight_decay 0 --num_train_epochs 2 --eval_interval 100 \
  --output_dir "$DEMO_DIR/critic" --zero_stage 2 --deepspeed --enable_tensorboard

stage "3/4 DPO from the SFT model (the alternative to step 3)"
sh run.sh --num_gpus "$NUM_GPUS" alpaca_rlhf/deepspeed_chat/training/step2_dpo_finetuning/main.py \
  --data_path data/demo/Dahoas/rm-static --data_output_path "$DEMO_DIR/data" \
  --model_name_or_path "$DEMO_DIR/actor" --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
  --max_seq_len 256 --data_split 0,8,2 --learning_rate 1e-3 --beta 0.1 --num_train_epochs 1 --max_train_samples 1600 \
  --lora_dim 8 --lora_module_name q_proj,k_proj,v_proj,o_proj --only_optimize_lora \
  --output_dir "$DEMO_DIR/dpo" --zero_stage 2 --deepspeed --enable_tensorboard

stage "4/4 step 3: PPO (LoRA actor and critic sharing their frozen bases with the reference and reward models)"
sh run.sh --num_gpus "$NUM_GPUS" alpaca_rlhf/deepspeed_chat/training/step3_rlhf_finetuning/main.py \
  --data_path data/demo/Dahoas/rm-static --data_output_path "$DEMO_DIR/data" \
  --actor_model_name_or_path "$DEMO_DIR/actor" --critic_model_name_or_path "$DEMO_DIR/critic" \
  --actor_zero_stage 2 --critic_zero_stage 2 --num_padding_at_beginning 0 --data_split 0,8,2 \
  --per_device_generation_batch_size 16 --per_device_training_batch_size 8 --ppo_epochs 2 \
  --max_prompt_seq_len 96 --max_answer_seq_len 32 --max_train_samples 1280 \
  --actor_learning_rate 1e-3 --critic_learning_rate 1e-3 --kl_coef 0.1 --num_warmup_steps 5 \
  --actor_lora_dim 8 --actor_lora_module_name layers. --critic_lora_dim 8 --critic_lora_module_name q_proj,k_proj \
  --only_optimize_lora --eval_interval 10 --save_interval 20 --no_auto_resume --output_dir "$DEMO_DIR/final" --deepspeed \
  --eval_reward_function alpaca_rlhf.tools.demo_task:reward \
  --enable_tensorboard

stage "4b step 3 without a critic: GRPO on the demo's verifiable reward (its grader), LoRA, from the SFT actor"
sh run.sh --num_gpus "$NUM_GPUS" alpaca_rlhf/deepspeed_chat/training/step3_rlhf_finetuning/main.py \
  --data_path data/demo/Dahoas/rm-static --data_output_path "$DEMO_DIR/data" --data_split 0,8,2 \
  --actor_model_name_or_path "$DEMO_DIR/actor" --actor_zero_stage 2 \
  --advantage_estimator group_norm --n_samples_per_prompt 4 --reward_model_type function \
  --reward_function alpaca_rlhf.tools.demo_task:reward --eval_reward_function alpaca_rlhf.tools.demo_task:reward \
  --kl_coef 0 --kl_loss_coef 0.04 --per_device_generation_batch_size 4 --per_device_training_batch_size 16 \
  --max_prompt_seq_len 96 --max_answer_seq_len 32 --max_train_samples 512 \
  --actor_learning_rate 1e-3 --num_warmup_steps 5 --actor_lora_dim 8 --actor_lora_module_name layers. \
  --only_optimize_lora --eval_interval 16 --no_auto_resume --output_dir "$DEMO_DIR/grpo" --deepspeed \
  --enable_tensorboard

stage "evaluation on held-out demo prompts (greedy, then sampled as PPO generates)"
set -- --model "$DEMO_DIR/actor" --model "$DEMO_DIR/dpo" --model "$DEMO_DIR/final/actor" --model "$DEMO_DIR/grpo/actor"
"$PY" -m alpaca_rlhf.tools.evaluate_demo "$@" \
  --reward_model "$DEMO_DIR/critic" --reference_model "$DEMO_DIR/actor" --num_prompts 300 \
  --output_json "$DEMO_DIR/evaluation.json"
"$PY" -m alpaca_rlhf.tools.evaluate_demo "$@" --num_prompts 300 --do_sample \
  --output_json "$DEMO_DIR/evaluation_sampled.json"

stage "report"
"$PY" -m alpaca_rlhf.tools.demo_report --demo_dir "$DEMO_DIR" --total_seconds "$(( $(date +%s) - START ))"

stage "done in $(( $(date +%s) - START ))s: report in $DEMO_DIR/report.md, models in $DEMO_DIR/{actor,critic,dpo,final/actor,grpo/actor}"
echo "chat with the result:"
echo "  sh run_inference.sh 0 alpaca_rlhf/inference/llama_chatbot_gradio.py --path $DEMO_DIR/actor --path $DEMO_DIR/final/actor"
