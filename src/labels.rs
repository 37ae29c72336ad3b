//! Class names: from the checkpoint's config.json when it has them, else the built-in ImageNet
//! label sets timm uses for that number of classes (1k, 12k and Google's 21k).

const IMAGENET_1K: &str = include_str!("../weights/labels/imagenet-1k.txt");
const IMAGENET_12K: &str = include_str!("../weights/labels/imagenet-12k.txt");
const IMAGENET_21K_GOOG: &str = include_str!("../weights/labels/imagenet-21k-goog.txt");

/// The built-in label set for `num_classes`, as timm's `infer_imagenet_subset` picks it.
pub fn builtin(num_classes: usize) -> Option<Vec<String>> {
    let text = match num_classes {
        1000 => IMAGENET_1K,
        11821 => IMAGENET_12K,
        21843 => IMAGENET_21K_GOOG,
        _ => return None,
    };
    Some(text.lines().map(str::to_owned).collect())
}

/// Fallback names when nothing better is known.
pub fn numbered(num_classes: usize) -> Vec<String> {
    (0..num_classes).map(|i| format!("class_{i}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_have_their_sizes_and_names() {
        for n in [1000, 11821, 21843] {
            assert_eq!(builtin(n).unwrap().len(), n);
        }
        assert_eq!(builtin(1000).unwrap()[282], "tiger cat");
        assert!(builtin(10).is_none());
        assert_eq!(numbered(2), vec!["class_0", "class_1"]);
    }
}
