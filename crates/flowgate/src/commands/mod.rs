pub mod bench;
pub mod bench_load;
pub mod bench_moe;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod run;
