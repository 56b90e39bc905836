;; The arithmetic of averaging seed tensors, four or eight lanes at a time
;; (WebAssembly SIMD): the same IEEE operations, in the same order, as
;; `sum[j] = sum[j] + weight * values[j]` and a Float32Array store in
;; JavaScript, about 8x faster. Lengths are multiples of 8; pointers are
;; byte offsets, 16-byte aligned. `npm run build:kernel` assembles this into
;; average-kernel.ts (a test checks the two agree).
(module
  (memory (export "memory") 1)

  ;; values[j] = the f32 whose top half is src[j] (bf16), j < n
  (func (export "decode_bf16") (param $src i32) (param $values i32) (param $n i32)
    (local $end i32) (local $halves v128)
    (local.set $end (i32.add (local.get $src) (i32.shl (local.get $n) (i32.const 1))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $src) (local.get $end)))
        (local.set $halves (v128.load (local.get $src)))
        (v128.store (local.get $values) (i32x4.shl (i32x4.extend_low_i16x8_u (local.get $halves)) (i32.const 16)))
        (v128.store offset=16 (local.get $values) (i32x4.shl (i32x4.extend_high_i16x8_u (local.get $halves)) (i32.const 16)))
        (local.set $src (i32.add (local.get $src) (i32.const 16)))
        (local.set $values (i32.add (local.get $values) (i32.const 32)))
        (br $next))))

  ;; sum[j] = weight * f64(values[j]) + sum[j], j < n (sum f64, values f32);
  ;; added in the order V8 adds JavaScript's `sum + weight * value` on x64, so
  ;; when both are NaN the same payload survives.
  (func (export "accumulate") (param $sum i32) (param $values i32) (param $n i32) (param $weight f64)
    (local $end i32) (local $w v128) (local $v v128)
    (local.set $w (f64x2.splat (local.get $weight)))
    (local.set $end (i32.add (local.get $values) (i32.shl (local.get $n) (i32.const 2))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $values) (local.get $end)))
        (local.set $v (v128.load (local.get $values)))
        (v128.store (local.get $sum)
          (f64x2.add (f64x2.mul (local.get $w) (f64x2.promote_low_f32x4 (local.get $v))) (v128.load (local.get $sum))))
        (v128.store offset=16 (local.get $sum)
          (f64x2.add
            (f64x2.mul (local.get $w)
              (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $v) (local.get $v))))
            (v128.load offset=16 (local.get $sum))))
        (local.set $values (i32.add (local.get $values) (i32.const 16)))
        (local.set $sum (i32.add (local.get $sum) (i32.const 32)))
        (br $next))))

  ;; values[j] = f32(sum[j]), rounded to nearest even, j < n
  (func (export "round_f32") (param $sum i32) (param $values i32) (param $n i32)
    (local $end i32)
    (local.set $end (i32.add (local.get $values) (i32.shl (local.get $n) (i32.const 2))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $values) (local.get $end)))
        (v128.store (local.get $values)
          (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
            (f32x4.demote_f64x2_zero (v128.load (local.get $sum)))
            (f32x4.demote_f64x2_zero (v128.load offset=16 (local.get $sum)))))
        (local.set $values (i32.add (local.get $values) (i32.const 16)))
        (local.set $sum (i32.add (local.get $sum) (i32.const 32)))
        (br $next))))

  ;; One lane of f32 bits to bf16, as dtype.ts's f32BitsToBf16: NaN stays NaN
  ;; (made quiet), else round to nearest even, overflow to Inf.
  (func $bf16 (param $bits v128) (result v128)
    (v128.bitselect
      (v128.or (i32x4.shr_u (local.get $bits) (i32.const 16)) (i32x4.splat (i32.const 0x40)))
      (i32x4.shr_u
        (i32x4.add
          (i32x4.add (local.get $bits) (i32x4.splat (i32.const 0x7fff)))
          (v128.and (i32x4.shr_u (local.get $bits) (i32.const 16)) (i32x4.splat (i32.const 1))))
        (i32.const 16))
      (i32x4.gt_u (v128.and (local.get $bits) (i32x4.splat (i32.const 0x7fffffff))) (i32x4.splat (i32.const 0x7f800000)))))

  ;; out[j] = bf16(values[j]), j < n
  (func (export "encode_bf16") (param $values i32) (param $out i32) (param $n i32)
    (local $end i32)
    (local.set $end (i32.add (local.get $out) (i32.shl (local.get $n) (i32.const 1))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $out) (local.get $end)))
        (v128.store (local.get $out)
          (i16x8.narrow_i32x4_u
            (call $bf16 (v128.load (local.get $values)))
            (call $bf16 (v128.load offset=16 (local.get $values)))))
        (local.set $values (i32.add (local.get $values) (i32.const 32)))
        (local.set $out (i32.add (local.get $out) (i32.const 16)))
        (br $next)))))
