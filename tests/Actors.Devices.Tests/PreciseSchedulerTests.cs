using System.Diagnostics;
using Akka.Actor;
using Akka.Configuration;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices.Timing;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Tests;

/// <summary>The precise sleeper (ppoll on an eventfd) on its own.</summary>
public sealed class PreciseSleeperTests
{
    [Fact]
    public void Sleep_lasts_at_least_its_timeout()
    {
        using var sleeper = new PreciseSleeper();
        var clock = Stopwatch.StartNew();
        var woken = sleeper.Sleep(TimeSpan.FromMilliseconds(3));
        Assert.False(woken);
        Assert.True(clock.Elapsed >= TimeSpan.FromMilliseconds(3), $"slept {clock.Elapsed}");
    }

    [Fact]
    public void Wake_from_another_thread_ends_a_sleep_without_timeout()
    {
        using var sleeper = new PreciseSleeper();
        var woken = false;
        var t = new Thread(() => woken = sleeper.Sleep(null)) { IsBackground = true };
        t.Start();
        Thread.Sleep(20);
        sleeper.Wake();
        Assert.True(t.Join(TimeSpan.FromSeconds(10)), "the sleep was not ended by Wake");
        Assert.True(woken);
    }

    [Fact]
    public void A_wake_before_the_sleep_ends_the_next_sleep_at_once_and_only_that_one()
    {
        using var sleeper = new PreciseSleeper();
        sleeper.Wake();
        Assert.True(sleeper.Sleep(TimeSpan.FromSeconds(30)));
        Assert.False(sleeper.Sleep(TimeSpan.FromMilliseconds(1))); // the wake was used up
    }
}

/// <summary>
/// The VM host's Akka scheduler in a real actor system: deadline order, cancellation, repetition,
/// Akka's own timers on it.
/// </summary>
public sealed class PreciseSchedulerTests : TestKit
{
    private static readonly Config WithPreciseScheduler = ConfigurationFactory.ParseString(
        $"akka.scheduler.implementation = \"{typeof(PreciseScheduler).AssemblyQualifiedName}\"");

    public PreciseSchedulerTests() : base(WithPreciseScheduler)
    {
    }

    private PreciseScheduler Scheduler => Assert.IsType<PreciseScheduler>(Sys.Scheduler);

    [Fact]
    public async Task Messages_arrive_in_deadline_order_not_in_the_order_scheduled()
    {
        // The three deadlines are fixed from one starting time, latest first. A test thread held
        // up between the calls for longer than the gap between two deadlines (a loaded host) would
        // let an earlier-scheduled one fire before a later one was even scheduled: that attempt
        // says nothing about the order, so it is made again (its messages are told apart by number).
        for (var attempt = 0; attempt < 5; attempt++)
        {
            var start = Stopwatch.StartNew();
            TimeSpan At(int ms) => TimeSpan.FromMilliseconds(Math.Max(0, ms - start.Elapsed.TotalMilliseconds));
            Sys.Scheduler.ScheduleTellOnce(At(200), TestActor, (attempt, "third"), ActorRefs.NoSender);
            Sys.Scheduler.ScheduleTellOnce(At(100), TestActor, (attempt, "second"), ActorRefs.NoSender);
            Sys.Scheduler.ScheduleTellOnce(At(2), TestActor, (attempt, "first"), ActorRefs.NoSender);
            if (start.Elapsed >= TimeSpan.FromMilliseconds(90)) continue; // "second" may have fired before "first" was scheduled

            var order = new List<string>();
            while (order.Count < 3)
                if (await ExpectMsgAsync<(int Attempt, string Name)>() is var (n, name) && n == attempt) order.Add(name);
            Assert.Equal(["first", "second", "third"], order);
            return;
        }
        Assert.Fail("the test thread was held up on every attempt (a host this loaded cannot show the order)");
    }

    [Fact]
    public async Task Equal_deadlines_keep_the_order_they_were_scheduled_in()
    {
        for (var i = 0; i < 50; i++) Sys.Scheduler.ScheduleTellOnce(TimeSpan.Zero, TestActor, i, ActorRefs.NoSender);
        for (var i = 0; i < 50; i++) Assert.Equal(i, await ExpectMsgAsync<int>());
    }

    [Fact]
    public async Task A_message_never_arrives_before_its_delay()
    {
        var clock = Stopwatch.StartNew();
        Sys.Scheduler.ScheduleTellOnce(TimeSpan.FromMilliseconds(25), TestActor, "late enough", ActorRefs.NoSender);
        await ExpectMsgAsync("late enough");
        Assert.True(clock.Elapsed >= TimeSpan.FromMilliseconds(25), $"arrived after {clock.Elapsed}");
    }

    [Fact]
    public async Task A_cancelled_message_is_not_delivered()
    {
        var cancel = Sys.Scheduler.ScheduleTellOnceCancelable(TimeSpan.FromMilliseconds(20), TestActor, "cancelled", ActorRefs.NoSender);
        Sys.Scheduler.ScheduleTellOnce(TimeSpan.FromMilliseconds(60), TestActor, "kept", ActorRefs.NoSender);
        cancel.Cancel();
        Assert.Equal("kept", await ExpectMsgAsync<string>());
        await ExpectNoMsgAsync(TimeSpan.FromMilliseconds(50));
    }

    [Fact]
    public async Task Repeated_work_repeats_until_cancelled()
    {
        var cancel = Sys.Scheduler.ScheduleTellRepeatedlyCancelable(TimeSpan.Zero, TimeSpan.FromMilliseconds(2), TestActor, "tick", ActorRefs.NoSender);
        for (var i = 0; i < 10; i++) await ExpectMsgAsync("tick");
        cancel.Cancel();
        await Task.Delay(20); // a tick already told may still be in the mailbox
        while (HasMessages) await ExpectMsgAsync("tick");
        await ExpectNoMsgAsync(TimeSpan.FromMilliseconds(50));
    }

    [Fact]
    public void Cancelled_work_is_swept_out_of_a_queue_that_fills_with_it()
    {
        // A timer re-armed often cancels its old one each time: the queue must not keep them all.
        for (var i = 0; i < 20_000; i++)
            Sys.Scheduler.ScheduleTellOnceCancelable(TimeSpan.FromHours(1), TestActor, i, ActorRefs.NoSender).Cancel();
        Assert.InRange(Scheduler.Queued, 0, 4097);
    }

    private sealed class TimerUser : ReceiveActor, IWithTimers
    {
        public ITimerScheduler Timers { get; set; } = null!;

        public TimerUser(IActorRef report)
        {
            Receive<string>(s => s == "arm", _ => Timers.StartSingleTimer("t", "fired", TimeSpan.FromMilliseconds(5)));
            Receive<string>(s => s == "fired", s => report.Tell(s));
        }
    }

    [Fact]
    public async Task Akka_timers_of_an_actor_run_on_it()
    {
        var user = Sys.ActorOf(Props.Create(() => new TimerUser(TestActor)));
        user.Tell("arm");
        await ExpectMsgAsync("fired");
    }
}
