//! Aliyun SMS `SendSms` (RPC-style API, version 2017-05-25): a signed GET per message,
//! and the answer's business `Code` classified.
//!
//! Signing (Aliyun's "RPC signature" documentation, SignatureVersion 1.0): every query
//! parameter but `Signature`, sorted by name, each `name=value` percent-encoded the
//! RFC 3986 way (unreserved `A-Z a-z 0-9 - _ . ~` kept, everything else `%XX` of its UTF-8
//! bytes, so a space is `%20`), joined with `&`, makes the canonicalized query; the string
//! to sign is `GET&%2F&` + percent-encode(canonicalized query); the signature is base64
//! of HMAC-SHA1 with the key `AccessKeySecret + "&"`.
//!
//! `OutId` carries the step's idempotency key (the provider's hook for deduplication,
//! echoed in delivery receipts), so every attempt of a step sends the same one.
//!
//! Business codes, as classified by [`classify_code`]:
//!
//! | `Code` | outcome |
//! |---|---|
//! | `OK` | delivered (`BizId` in the detail) |
//! | `isv.BUSINESS_LIMIT_CONTROL`, `isv.DAY_LIMIT_CONTROL`, `Throttling`, `Throttling.*` | rate limited: retried, and the channel slowed down |
//! | `isv.MOBILE_NUMBER_ILLEGAL`, `isv.TEMPLATE_MISSING_PARAMETERS`, `isv.SMS_TEMPLATE_ILLEGAL`, `isv.SMS_SIGNATURE_ILLEGAL`, `isv.INVALID_PARAMETERS`, `isv.BLACK_KEY_CONTROL_LIMIT`, any other `isv.*` | permanent (the request or the account's setup is wrong) |
//! | `InvalidAccessKeyId`, `InvalidAccessKeyId.*`, `SignatureDoesNotMatch`, `isp.RAM_PERMISSION_DENY` | permanent (credentials or permissions: no retry fixes them) |
//! | `isp.SYSTEM_ERROR`, any other `isp.*`, `ServiceUnavailable`, `InternalError`, `SignatureNonceUsed` | retryable |
//! | anything else | retryable on HTTP 5xx, otherwise permanent |

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use secrecy::ExposeSecret as _;
use serde::Deserialize;
use sha1::Sha1;

use super::config::AliyunConfig;
use super::scrub;
use crate::channel::{Delivered, Delivery, Error, retry_after, send_traced, transport_error};

/// Step params the adapter reads itself; the others become `TemplateParam`.
const RESERVED_PARAMS: [&str; 3] = ["sign_name", "template_code", "template_param"];

/// Characters of a provider's `Message` kept in a step's detail.
const DETAIL_CHARS: usize = 160;

/// Largest answer read.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How one business code is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The message was accepted.
    Delivered,
    /// The provider asked us to slow down.
    RateLimited,
    /// Another attempt may succeed.
    Retryable,
    /// No retry will fix it.
    Permanent,
}

/// The table in the module documentation. `http_status` decides unknown codes.
pub(crate) fn classify_code(code: &str, http_status: u16) -> Class {
    const RATE_LIMITED: [&str; 3] = [
        "isv.BUSINESS_LIMIT_CONTROL",
        "isv.DAY_LIMIT_CONTROL",
        "Throttling",
    ];
    const PERMANENT: [&str; 10] = [
        "isv.MOBILE_NUMBER_ILLEGAL",
        "isv.TEMPLATE_MISSING_PARAMETERS",
        "isv.SMS_TEMPLATE_ILLEGAL",
        "isv.SMS_SIGNATURE_ILLEGAL",
        "isv.INVALID_PARAMETERS",
        "isv.BLACK_KEY_CONTROL_LIMIT",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "isp.RAM_PERMISSION_DENY",
        "MissingParameter",
    ];
    const RETRYABLE: [&str; 4] = [
        "isp.SYSTEM_ERROR",
        "ServiceUnavailable",
        "InternalError",
        "SignatureNonceUsed",
    ];
    if code == "OK" {
        return Class::Delivered;
    }
    if RATE_LIMITED.contains(&code) || code.starts_with("Throttling.") {
        return Class::RateLimited;
    }
    if PERMANENT.contains(&code) || code.starts_with("InvalidAccessKeyId.") {
        return Class::Permanent;
    }
    if RETRYABLE.contains(&code) || code.starts_with("isp.") {
        return Class::Retryable;
    }
    if code.starts_with("isv.") {
        return Class::Permanent;
    }
    if http_status >= 500 {
        Class::Retryable
    } else {
        Class::Permanent
    }
}

/// RFC 3986 percent-encoding as Aliyun's signature documentation specifies it.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The canonicalized query: parameters sorted by name, encoded, joined with `&`.
pub(crate) fn canonicalized_query(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `GET&%2F&` + percent-encode(canonicalized query).
pub(crate) fn string_to_sign(params: &BTreeMap<String, String>) -> String {
    format!("GET&%2F&{}", percent_encode(&canonicalized_query(params)))
}

/// Base64 of HMAC-SHA1(`secret&`, string to sign).
pub(crate) fn signature(access_key_secret: &str, params: &BTreeMap<String, String>) -> String {
    let key = format!("{access_key_secret}&");
    let mut mac = <Hmac<Sha1>>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(string_to_sign(params).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `TemplateParam`: `params.template_param` (an object or a JSON string) when given,
/// otherwise the step's other params (scalars as strings); `None` when there are none.
fn template_param(params: &serde_json::Value) -> Result<Option<String>, Error> {
    if let Some(given) = params.get("template_param") {
        return match given {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(text) => Ok(Some(text.clone())),
            serde_json::Value::Object(_) => Ok(Some(given.to_string())),
            _ => Err(Error::permanent(
                "params.template_param: expected a JSON object or a string",
            )),
        };
    }
    let Some(object) = params.as_object() else {
        return Ok(None);
    };
    let values: serde_json::Map<String, serde_json::Value> = object
        .iter()
        .filter(|(name, _)| !RESERVED_PARAMS.contains(&name.as_str()))
        .map(|(name, value)| {
            let value = match value {
                serde_json::Value::Number(n) => serde_json::Value::String(n.to_string()),
                serde_json::Value::Bool(b) => serde_json::Value::String(b.to_string()),
                other => other.clone(),
            };
            (name.clone(), value)
        })
        .collect();
    Ok((!values.is_empty()).then(|| serde_json::Value::Object(values).to_string()))
}

/// A string param that overrides a channel setting, or the setting.
fn param_or(delivery: &Delivery, name: &str, default: Option<&str>) -> Result<String, Error> {
    match delivery.params.get(name) {
        Some(serde_json::Value::String(value)) if !value.is_empty() => Ok(value.clone()),
        Some(serde_json::Value::Null) | None => default.map(str::to_owned).ok_or_else(|| {
            Error::permanent(format!("params.{name}: required (the channel sets none)"))
        }),
        Some(_) => Err(Error::permanent(format!(
            "params.{name}: expected a non-empty string"
        ))),
    }
}

/// Every parameter of one `SendSms` request but `Signature`.
fn request_params(
    config: &AliyunConfig,
    delivery: &Delivery,
    phone: &str,
) -> Result<BTreeMap<String, String>, Error> {
    let sign_name = param_or(delivery, "sign_name", Some(&config.sign_name))?;
    let template_code = param_or(delivery, "template_code", config.template_code.as_deref())?;
    let mut params: BTreeMap<String, String> = [
        ("AccessKeyId", config.access_key_id.clone()),
        ("Action", "SendSms".to_owned()),
        ("Format", "JSON".to_owned()),
        ("OutId", delivery.idempotency_key.clone()),
        ("PhoneNumbers", phone.to_owned()),
        ("SignName", sign_name),
        ("SignatureMethod", "HMAC-SHA1".to_owned()),
        ("SignatureNonce", format!("{:032x}", rand::random::<u128>())),
        ("SignatureVersion", "1.0".to_owned()),
        ("TemplateCode", template_code),
        (
            "Timestamp",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        ),
        ("Version", "2017-05-25".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    if let Some(template_param) = template_param(&delivery.params)? {
        params.insert("TemplateParam".to_owned(), template_param);
    }
    Ok(params)
}

/// The JSON answer, success or failure.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    biz_id: String,
}

pub(super) async fn send(
    http: &reqwest::Client,
    config: &AliyunConfig,
    timeout: Duration,
    delivery: &Delivery,
    phone: &str,
) -> Result<Delivered, Error> {
    let params = request_params(config, delivery, phone)?;
    let signature = signature(config.access_key_secret.expose_secret(), &params);
    let query = format!(
        "{}&Signature={}",
        canonicalized_query(&params),
        percent_encode(&signature)
    );
    let mut url = config.url.clone();
    url.set_query(Some(&query));
    let response = send_traced(http, http.get(url), &delivery.traceparent)
        .await
        .map_err(|error| transport_error(error, timeout))?;
    let status = response.status().as_u16();
    let after = retry_after(response.headers(), std::time::SystemTime::now());
    let body = read_body(response).await;
    classify(status, after, &body)
}

async fn read_body(mut response: reqwest::Response) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < MAX_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes
}

/// The outcome of an answer with HTTP `status` and `body`.
fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Result<Delivered, Error> {
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        let detail = format!(
            "aliyun HTTP {status}: {}",
            scrub(&String::from_utf8_lossy(body), DETAIL_CHARS)
        );
        let detail = detail.trim_end_matches([' ', ':']).to_owned();
        return Err(match status {
            200..=299 => Error::retryable(format!("{detail} (not a SendSms answer)")),
            429 => Error::rate_limited(detail, retry_after),
            500..=599 => Error::Retryable {
                detail,
                retry_after,
                rate_limited: false,
            },
            _ => Error::permanent(detail),
        });
    };
    let code = scrub(&answer.code, 80);
    let detail = || {
        let message = scrub(&answer.message, DETAIL_CHARS);
        if message.is_empty() {
            format!("aliyun {code}")
        } else {
            format!("aliyun {code}: {message}")
        }
    };
    match classify_code(&answer.code, status) {
        // A BizId is Aliyun's receipt number, not personal data: kept whole.
        Class::Delivered => Ok(Delivered::new(format!(
            "aliyun OK BizId={}",
            answer
                .biz_id
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '^' | '-' | '_'))
                .take(80)
                .collect::<String>()
        ))),
        Class::RateLimited => Err(Error::rate_limited(detail(), retry_after)),
        Class::Retryable => Err(Error::Retryable {
            detail: detail(),
            retry_after,
            rate_limited: false,
        }),
        Class::Permanent => Err(Error::permanent(detail())),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::channel::tests::delivery;

    /// The example of Aliyun's SMS signature documentation ("签名机制").
    fn documented_example() -> BTreeMap<String, String> {
        [
            ("AccessKeyId", "testId"),
            ("Action", "SendSms"),
            ("Format", "XML"),
            ("OutId", "123"),
            ("PhoneNumbers", "15300000001"),
            ("RegionId", "cn-hangzhou"),
            ("SignName", "阿里云短信测试专用"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_71390007"),
            ("TemplateParam", "{\"customer\":\"test\"}"),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Version", "2017-05-25"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn signs_the_documented_example() {
        let params = documented_example();
        assert_eq!(
            string_to_sign(&params),
            "GET&%2F&AccessKeyId%3DtestId%26Action%3DSendSms%26Format%3DXML%26OutId%3D123\
             %26PhoneNumbers%3D15300000001%26RegionId%3Dcn-hangzhou%26SignName%3D\
             %25E9%2598%25BF%25E9%2587%258C%25E4%25BA%2591%25E7%259F%25AD%25E4%25BF%25A1\
             %25E6%25B5%258B%25E8%25AF%2595%25E4%25B8%2593%25E7%2594%25A8\
             %26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D45e25e9b-0a6f-4070-8c85-2956eda1b466\
             %26SignatureVersion%3D1.0%26TemplateCode%3DSMS_71390007\
             %26TemplateParam%3D%257B%2522customer%2522%253A%2522test%2522%257D\
             %26Timestamp%3D2017-07-12T02%253A42%253A19Z%26Version%3D2017-05-25"
        );
        assert_eq!(
            signature("testSecret", &params),
            "zJDF+Lrzhj/ThnlvIToysFRq6t4="
        );
    }

    #[test]
    fn percent_encodes_the_rfc_3986_way() {
        assert_eq!(percent_encode("a b*c~d/e+f"), "a%20b%2Ac~d%2Fe%2Bf");
        assert_eq!(percent_encode("-_.~09AZaz"), "-_.~09AZaz");
    }

    #[test]
    fn classifies_business_codes() {
        let cases = [
            ("OK", Class::Delivered),
            ("isv.BUSINESS_LIMIT_CONTROL", Class::RateLimited),
            ("Throttling.User", Class::RateLimited),
            ("Throttling", Class::RateLimited),
            ("isv.MOBILE_NUMBER_ILLEGAL", Class::Permanent),
            ("isv.TEMPLATE_MISSING_PARAMETERS", Class::Permanent),
            ("isv.SMS_TEMPLATE_ILLEGAL", Class::Permanent),
            ("isv.SMS_SIGNATURE_ILLEGAL", Class::Permanent),
            ("isv.INVALID_PARAMETERS", Class::Permanent),
            ("isv.BLACK_KEY_CONTROL_LIMIT", Class::Permanent),
            ("isv.SOMETHING_NEW", Class::Permanent),
            ("InvalidAccessKeyId.NotFound", Class::Permanent),
            ("SignatureDoesNotMatch", Class::Permanent),
            ("isp.RAM_PERMISSION_DENY", Class::Permanent),
            ("isp.SYSTEM_ERROR", Class::Retryable),
            ("ServiceUnavailable", Class::Retryable),
        ];
        for (code, class) in cases {
            assert_eq!(classify_code(code, 400), class, "{code}");
        }
        assert_eq!(classify_code("Unknown.Thing", 503), Class::Retryable);
        assert_eq!(classify_code("Unknown.Thing", 400), Class::Permanent);
    }

    #[test]
    fn classifies_answers() {
        let ok = classify(
            200,
            None,
            br#"{"Message":"OK","RequestId":"r","BizId":"900619746936498440^0","Code":"OK"}"#,
        );
        assert_eq!(
            ok,
            Ok(Delivered::new("aliyun OK BizId=900619746936498440^0"))
        );

        let limited = classify(
            200,
            None,
            r#"{"Message":"触发号码天级流控Permits:10","Code":"isv.BUSINESS_LIMIT_CONTROL"}"#
                .as_bytes(),
        )
        .unwrap_err();
        assert!(limited.is_rate_limited());
        assert_eq!(
            limited.detail(),
            "aliyun isv.BUSINESS_LIMIT_CONTROL: 触发号码天级流控Permits:10"
        );

        let illegal = classify(
            200,
            None,
            br#"{"Message":"invalid mobile 15300000001","Code":"isv.MOBILE_NUMBER_ILLEGAL"}"#,
        )
        .unwrap_err();
        assert!(!illegal.is_retryable());
        assert_eq!(
            illegal.detail(),
            "aliyun isv.MOBILE_NUMBER_ILLEGAL: invalid mobile ***"
        );

        let down = classify(503, Some(Duration::from_secs(2)), b"<html>busy</html>").unwrap_err();
        assert_eq!(down.retry_after(), Some(Duration::from_secs(2)));
        assert!(down.is_retryable() && !down.is_rate_limited());

        let denied = classify(403, None, b"").unwrap_err();
        assert_eq!(denied, Error::permanent("aliyun HTTP 403"));
    }

    fn config(template_code: Option<&str>) -> AliyunConfig {
        AliyunConfig {
            url: reqwest::Url::parse("http://127.0.0.1:9/").unwrap(),
            access_key_id: "LTAI".to_owned(),
            access_key_secret: SecretString::from("s"),
            sign_name: "品牌".to_owned(),
            template_code: template_code.map(str::to_owned),
        }
    }

    #[test]
    fn builds_the_request_from_the_delivery() {
        let mut delivery = delivery();
        delivery.params =
            serde_json::json!({ "coupon": "WELCOME10", "amount": 10, "template_code": "SMS_9" });
        let params = request_params(&config(Some("SMS_1")), &delivery, "+8613800000000").unwrap();
        assert_eq!(params["OutId"], "run-1:coupon");
        assert_eq!(params["PhoneNumbers"], "+8613800000000");
        assert_eq!(params["TemplateCode"], "SMS_9");
        assert_eq!(params["SignName"], "品牌");
        assert_eq!(
            params["TemplateParam"],
            r#"{"amount":"10","coupon":"WELCOME10"}"#
        );
        assert_eq!(params["Timestamp"].len(), "2017-07-12T02:42:19Z".len());

        delivery.params = serde_json::json!({ "template_param": { "code": "1234" } });
        let params = request_params(&config(Some("SMS_1")), &delivery, "1").unwrap();
        assert_eq!(params["TemplateParam"], r#"{"code":"1234"}"#);

        delivery.params = serde_json::json!({});
        assert!(
            !request_params(&config(Some("SMS_1")), &delivery, "1")
                .unwrap()
                .contains_key("TemplateParam")
        );
        let error = request_params(&config(None), &delivery, "1").unwrap_err();
        assert_eq!(
            error,
            Error::permanent("params.template_code: required (the channel sets none)")
        );
    }
}
