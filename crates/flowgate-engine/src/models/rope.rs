//! Rotary embedding frequencies: plain, llama3-scaled, linear-scaled, or per-dimension
//! factors read from a GGUF `rope_freqs.weight` tensor.

use flowgate_formats::{RopeScaling, RopeSpec};

/// Inverse frequencies, one per rotated pair: `theta^(-2i/d)` adjusted by scaling.
pub fn inv_freq(rope: &RopeSpec, head_dim: usize, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            // HF: 1 / base^(arange(0, d, 2) / d), in f32.
            let mut f = 1.0 / rope.theta.powf((2 * i) as f32 / head_dim as f32);
            if let Some(ff) = freq_factors {
                f /= ff.get(i).copied().unwrap_or(1.0);
            } else {
                match rope.scaling {
                    Some(RopeScaling::Linear { factor }) => f /= factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position,
                    }) => {
                        let old = original_max_position as f32;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f /= factor;
                        } else if wavelen >= high_wavelen {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            f = (1.0 - smooth) * f / factor + smooth * f;
                        }
                    }
                    None => {}
                }
            }
            f
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_formats::RopeStyle;

    #[test]
    fn llama3_scaling_bands() {
        let spec = RopeSpec {
            theta: 500000.0,
            style: RopeStyle::Halves,
            scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192,
            }),
        };
        let plain = inv_freq(
            &RopeSpec {
                scaling: None,
                ..spec.clone()
            },
            128,
            None,
        );
        let scaled = inv_freq(&spec, 128, None);
        // Highest frequency (short wavelength) is untouched, lowest is divided by the factor.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= 1e-12 * plain[63].abs().max(1e-30));
        // In between: bounded by the two.
        for i in 0..64 {
            assert!(scaled[i] <= plain[i] && scaled[i] >= plain[i] / 8.0 * 0.999_999);
        }
    }
}
