// A Java client on the JRE's defaults (IPv6 sockets, IPv4 addresses mapped): GET a URL.
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URL;

public class HttpGet {
    public static void main(String[] args) throws Exception {
        HttpURLConnection conn = (HttpURLConnection) new URL(args[0]).openConnection();
        conn.setConnectTimeout(5000);
        conn.setReadTimeout(5000);
        try (InputStream body = conn.getInputStream()) {
            System.out.println(conn.getResponseCode() + " " + new String(body.readAllBytes()).trim());
        }
    }
}
