using Akka.TestKit.Xunit2;
using CoordGen.Actors.Contexts;
using CoordGen.Messages;

namespace CoordGen.Actors.Tests;

/// <summary>The context store actor's part in prefix pins: releases by generation, and sent again after a device restart.</summary>
public class ContextStoreActorSpecs : TestKit
{
    [Fact]
    public async Task In_prompt_store_should_release_its_pin_by_generation_when_it_changes_or_is_deleted()
    {
        var device = CreateTestProbe();
        var stores = Sys.ActorOf(ContextStoreActor.Props(device: device.Ref));
        stores.Tell(new ContextStoreProtocol.CreateStore("docs", InPrompt: true), TestActor);
        Assert.True((await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>()).InPrompt);
        stores.Tell(new ContextStoreProtocol.AddDocument("docs", TokenSequence.From([5, 6, 7])), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>();
        stores.Tell(new ContextStoreProtocol.GetPromptDocuments("docs"), TestActor);
        var docs = await ExpectMsgAsync<ContextStoreProtocol.PromptDocuments>();
        Assert.Equal([5, 6, 7], docs.Documents.Single().Tokens.ToArray());

        // The empty store's generation was released when the document came; the document's goes on delete.
        var first = await device.ExpectMsgAsync<DeviceProtocol.ReleasePrefix>();
        Assert.True(first.ThroughGeneration < docs.Generation);
        stores.Tell(new ContextStoreProtocol.DeleteStore("docs"), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreDeleted>();
        Assert.Equal(docs.Generation, (await device.ExpectMsgAsync<DeviceProtocol.ReleasePrefix>()).ThroughGeneration);

        // A drafting-only store pins nothing, so it releases nothing.
        stores.Tell(new ContextStoreProtocol.CreateStore("drafts"), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>();
        stores.Tell(new ContextStoreProtocol.AddDocument("drafts", TokenSequence.From([1])), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>();
        await device.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(200));
    }

    [Fact]
    public async Task A_release_that_meets_a_restarting_device_should_be_sent_again()
    {
        var device = CreateTestProbe();
        var stores = Sys.ActorOf(ContextStoreActor.Props(device: device.Ref));
        stores.Tell(new ContextStoreProtocol.CreateStore("docs", InPrompt: true), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>();
        stores.Tell(new ContextStoreProtocol.DeleteStore("docs"), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreDeleted>();
        var lost = await device.ExpectMsgAsync<DeviceProtocol.ReleasePrefix>();
        device.Reply(SupervisionProtocol.DeviceRestarting.Instance); // as the back-off supervisor answers while the device is down
        var again = await device.ExpectMsgAsync<DeviceProtocol.ReleasePrefix>(TimeSpan.FromSeconds(3));
        Assert.Equal(lost, again);
    }
}
