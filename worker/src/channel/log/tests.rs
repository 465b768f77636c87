use super::*;
use crate::channel::tests::delivery;

#[test]
fn line_shows_step_contact_message_and_params() {
    assert_eq!(
        line(&delivery()),
        "[console:crm] welcome-new-customer v3 step coupon (send_message) attempt 1 \
         -> contact c-1001: 王芳，欢迎！新人券 WELCOME10 已到账 {\"coupon\":\"WELCOME10\"}"
    );
}

#[test]
fn line_leaves_out_empty_message_and_params() {
    let mut delivery = delivery();
    delivery.params = serde_json::json!({});
    delivery.message = String::new();
    assert_eq!(
        line(&delivery),
        "[console:crm] welcome-new-customer v3 step coupon (send_message) attempt 1 -> contact c-1001"
    );
}

#[tokio::test]
async fn delivering_always_succeeds() {
    let delivered = LogAdapter.deliver(&delivery()).await.unwrap();
    assert_eq!(delivered.detail, "printed");
}
