// Readiness probe for start-kafka.sh, run with the JDK's source launcher
// (no build step):  java -cp 'LIBS/*' ReadyProbe.java BOOTSTRAP BROKERS TIMEOUT_MS
// Waits until BROKERS brokers are registered, then until one acks=all produce
// to topic __ready (RF = min(BROKERS,3)) succeeds. Exit 0 = ready, 1 = timeout.
import java.util.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringSerializer;

public class ReadyProbe {
  public static void main(String[] a) throws Exception {
    String bootstrap = a[0];
    int brokers = Integer.parseInt(a[1]);
    long deadline = System.currentTimeMillis() + Long.parseLong(a[2]);
    Properties p = new Properties();
    p.put("bootstrap.servers", bootstrap);
    p.put("request.timeout.ms", "3000");
    p.put("default.api.timeout.ms", "5000");
    p.put("reconnect.backoff.max.ms", "200");
    String err = "";
    try (Admin admin = Admin.create(p)) {
      while (true) {
        if (System.currentTimeMillis() > deadline) { System.err.println("ReadyProbe: timeout: " + err); System.exit(1); }
        try {
          int n = admin.describeCluster().nodes().get().size();
          if (n < brokers) { err = n + "/" + brokers + " brokers registered"; Thread.sleep(200); continue; }
          try {
            admin.createTopics(List.of(new NewTopic("__ready", 1, (short) Math.min(brokers, 3)))).all().get();
          } catch (Exception e) {
            if (!(e.getCause() instanceof TopicExistsException)) throw e;
          }
          break;
        } catch (Exception e) { err = e.toString(); Thread.sleep(200); }
      }
    }
    p.put("key.serializer", StringSerializer.class.getName());
    p.put("value.serializer", StringSerializer.class.getName());
    p.put("acks", "all");
    p.put("max.block.ms", "3000");
    p.put("delivery.timeout.ms", "5000");
    p.put("linger.ms", "0");
    try (Producer<String, String> prod = new KafkaProducer<>(p)) {
      while (true) {
        if (System.currentTimeMillis() > deadline) { System.err.println("ReadyProbe: timeout: " + err); System.exit(1); }
        try {
          prod.send(new ProducerRecord<>("__ready", "k", "v")).get();
          System.out.println("ready");
          return;
        } catch (Exception e) { err = e.toString(); Thread.sleep(200); }
      }
    }
  }
}
